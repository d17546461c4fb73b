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
//! | `GET /v1/snapshots/{id}/files[?path=P&disk=D]` | a snapshot's volumes, or the folder or file P inside one: the JSON of `files ls --json` |
//! | `GET /v1/snapshots/{id}/files/content?path=P` | the regular file P, streamed (`Range: bytes=` of one span gives 206) |
//! | `POST /v1/plans` | check a recovery plan ([`crate::agent::Plan`], JSON) whole and start applying it: its [`crate::agent::PlanStatus`]; 400 naming each bad entry, nothing mounted |
//! | `GET /v1/plans/{id}` | this server's run of plan `id`: each entry's state, the run's phase and events |
//! | `POST /v1/plans/status` | where each entry of the plan in the body stands, from the mounts; changes nothing |
//! | `GET /v1/snapshots` | the snapshots by VM, newest first, each VM with its boot profile |
//! | `DELETE /v1/profiles/{vm}` | forget a VM's boot profile (`profile forget`) |
//! | `GET /v1/stats` | cache and fetch scheduler counters, and the last 10 minutes of them (a point every 2 s) |
//! | `GET /metrics` | Prometheus text format (see `metrics.rs`); no token needed |
//! | `POST /v1/session`, `GET /v1/session`, `DELETE /v1/session` | the console's sign-in: the token for a session cookie, the page's CSRF value, sign-out |
//! | `GET /`, `/console.js`, `/console.css` | the operator's console (`console.rs`), no token needed to load it |
//! Every other `/v1` route needs `Authorization: Bearer TOKEN`, or a console session's cookie;
//! with the cookie, a request that changes anything also needs the session's
//! `X-Livemount-CSRF` value and, if it has an `Origin`, this server's own (`session.rs`).

mod api;
mod client;
mod console;
mod listener;
mod session;

pub use api::{
    serve_api, ApiState, AttachInfo, ByClass, ListedMount, MountReply, SessionReply, StatsReply,
    StatusReply,
};
pub use client::Client;

/// The token file in the state directory.
pub const TOKEN_FILE: &str = "api-token";
/// The key every iSCSI target's CHAP secret is derived from (kept like the token).
pub const CHAP_KEY_FILE: &str = "iscsi-chap-key";
/// Where a running server writes its API address for the CLI.
pub const ADDR_FILE: &str = "api.json";

/// Contents of `api.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApiAddr {
    pub url: String,
    pub pid: u32,
}

/// Reads the token, or creates one (32 random bytes, hex) with mode 0600, durably (its folder
/// fsynced).
pub fn load_or_create_token(state: &std::path::Path) -> std::io::Result<String> {
    load_or_create_secret(state, TOKEN_FILE)
}

/// The key the iSCSI targets' CHAP secrets come from: the file [`CHAP_KEY_FILE`], made and
/// kept as the API token is (a new key makes every target's secret new).
pub fn load_or_create_chap_key(state: &std::path::Path) -> std::io::Result<[u8; 32]> {
    let text = load_or_create_secret(state, CHAP_KEY_FILE)?;
    Ok(*blake3::hash(text.as_bytes()).as_bytes())
}

/// Reads the secret in `state/file`, or creates one (32 random bytes, hex) with mode 0600,
/// durably.
fn load_or_create_secret(state: &std::path::Path, file: &str) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = state.join(file);
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
    crate::durable::replace_private(&path, token.as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_chap_key_is_kept_apart_from_the_token() {
        let t = tempfile::tempdir().unwrap();
        let token = load_or_create_token(t.path()).unwrap();
        let key = load_or_create_chap_key(t.path()).unwrap();
        assert_eq!(load_or_create_chap_key(t.path()).unwrap(), key);
        assert_ne!(*blake3::hash(token.as_bytes()).as_bytes(), key);
        let mode = std::fs::metadata(t.path().join(CHAP_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_new_token_is_private_durable_and_kept() {
        let t = tempfile::tempdir().unwrap();
        let token = load_or_create_token(t.path()).unwrap();
        let path = t.path().join(TOKEN_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Written, then its folder fsynced: the token survives a power cut.
        assert_eq!(
            crate::durable::synced_under(t.path()),
            [path.clone(), t.path().to_path_buf()]
        );
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create_token(t.path()).unwrap(), token);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
