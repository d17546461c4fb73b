//! The control API: HTTP/JSON on the agent's API address, used by the CLI.
//!
//! Owns: the routes (below), bearer-token checks, the token file (`STATE/api-token`, mode 0600)
//! and the address file (`STATE/api.json`) through which the CLI finds a running server, and the
//! client the CLI uses.
//! Must not: hold logic of its own; every route calls the agent.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/status` | server facts, cache counters |
//! | `GET /v1/mounts` | every live mount |
//! | `POST /v1/mounts` | mount a snapshot ([`crate::agent::MountRequest`]) |
//! | `DELETE /v1/mounts/{name}[?keep_writes=true]` | unmount, discarding or keeping its writes |
//! | `GET /metrics` | Prometheus text format (see `metrics.rs`); no token needed |
//! Every `/v1` route needs `Authorization: Bearer TOKEN`.

mod api;
mod client;
mod listener;

pub use api::{serve_api, ApiState, AttachInfo, MountReply, StatusReply};
pub use client::Client;

/// The token file in the state directory.
pub const TOKEN_FILE: &str = "api-token";
/// Where a running server writes its API address for the CLI.
pub const ADDR_FILE: &str = "api.json";

/// Contents of `api.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApiAddr {
    pub url: String,
    pub pid: u32,
}

/// Reads the token, or creates one (32 random bytes, hex) with mode 0600.
pub fn load_or_create_token(state: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = state.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => {
            // Keep the file private even if someone loosened it.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            return Ok(t.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))?;
    let token = blake3::hash(&seed).to_hex().to_string();
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}
