//! The console's sign-in sessions: a browser that posted the API token gets a session id in a
//! cookie (`HttpOnly; SameSite=Strict; Path=/`), never the token itself, and a CSRF value that
//! its state-changing requests must echo in [`CSRF_HEADER`] (decision 0028).
//!
//! Owns: the server-side map of sessions (in memory: a restart signs every browser out), their
//! expiry, and the checks of a cookie request.
//! Must not: know about routes or the token; the API decides who may sign in.
//! Bounds: at most [`MAX_SESSIONS`]; a new one beyond that replaces the oldest. Each lasts
//! [`SESSION_TTL`] from its sign-in. The map is keyed by a hash of the session id, so a lookup's
//! timing says nothing about the ids it holds.
//! Locking: one std mutex, held for a lookup or an insert, never across an await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "livemount_session";
/// The header a state-changing cookie request must carry, equal to its session's CSRF value.
pub const CSRF_HEADER: &str = "x-livemount-csrf";
/// Sessions at once (browsers signed in); more replace the oldest.
pub const MAX_SESSIONS: usize = 64;
/// How long a session lasts from its sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// A session as its browser learns it at sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Goes into the HttpOnly cookie only.
    pub id: String,
    /// Handed to the page, which sends it back in [`CSRF_HEADER`].
    pub csrf: String,
}

#[derive(Debug)]
struct Entry {
    csrf: String,
    created: Instant,
}

/// The signed-in sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Entry>>,
}

fn key(id: &str) -> [u8; 32] {
    *blake3::hash(id.as_bytes()).as_bytes()
}

/// 32 random bytes, hex.
fn random_hex() -> std::io::Result<String> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))?;
    Ok(seed.iter().map(|b| format!("{b:02x}")).collect())
}

impl Sessions {
    /// Starts a session (the caller has checked the token).
    pub fn create(&self) -> std::io::Result<NewSession> {
        let s = NewSession {
            id: random_hex()?,
            csrf: random_hex()?,
        };
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, e| now.duration_since(e.created) < SESSION_TTL);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, e)| e.created).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(
            key(&s.id),
            Entry {
                csrf: s.csrf.clone(),
                created: now,
            },
        );
        Ok(s)
    }

    /// The CSRF value of live session `id`; none: unknown, signed out or expired.
    pub fn csrf(&self, id: &str) -> Option<String> {
        let mut map = self.lock();
        let k = key(id);
        match map.get(&k) {
            Some(e) if e.created.elapsed() < SESSION_TTL => Some(e.csrf.clone()),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends session `id`; whether it was live.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(&key(id)).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The session id in a `Cookie` header, if it names one.
pub fn cookie_session(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value of a new session. No `Secure`: the API serves plain HTTP (on
/// loopback by default), where a browser would drop a Secure cookie (decision 0028).
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// Whether a state-changing request with a session cookie comes from the page itself: its
/// `Origin`, when it has one, is this server as the browser reached it (`http://` or
/// `https://` + `Host`), and
/// `Sec-Fetch-Site`, when there is one, is not another site.
pub fn same_origin(headers: &axum::http::HeaderMap) -> Result<(), String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return Err(format!(
                "a request from another site ({site}) may not change anything"
            ));
        }
    }
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        let host = text("host").unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        // https too: the same host behind a TLS proxy that keeps `Host`.
        let own = ["http://", "https://"]
            .iter()
            .any(|scheme| origin.strip_prefix(scheme) == Some(host));
        if host.is_empty() || !own {
            return Err(format!(
                "a request from origin {origin:?} may not change anything on http://{host}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn a_session_is_found_by_its_id_only_and_ends_when_removed() {
        let s = Sessions::default();
        let a = s.create().unwrap();
        let b = s.create().unwrap();
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, a.csrf);
        assert_eq!(a.id.len(), 64);
        assert_eq!(s.csrf(&a.id), Some(a.csrf.clone()));
        assert_eq!(s.csrf(&a.csrf), None, "the CSRF value is no session id");
        assert_eq!(s.csrf(""), None);
        assert!(s.remove(&a.id));
        assert!(!s.remove(&a.id));
        assert_eq!(s.csrf(&a.id), None);
        assert_eq!(s.csrf(&b.id), Some(b.csrf));
    }

    #[test]
    fn sessions_beyond_the_limit_replace_the_oldest() {
        let s = Sessions::default();
        let first = s.create().unwrap();
        let mut last = None;
        for _ in 0..MAX_SESSIONS {
            last = Some(s.create().unwrap());
        }
        assert_eq!(s.csrf(&first.id), None);
        let last = last.unwrap();
        assert_eq!(s.csrf(&last.id), Some(last.csrf));
        assert_eq!(s.lock().len(), MAX_SESSIONS);
    }

    #[test]
    fn the_cookie_is_read_among_others_and_never_carries_secure_nor_the_token() {
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_static("a=1; livemount_session=abc ; b=2"),
        );
        assert_eq!(cookie_session(&h).as_deref(), Some("abc"));
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("livemount_session="));
        assert_eq!(cookie_session(&h), None);
        assert_eq!(cookie_session(&HeaderMap::new()), None);
        let c = set_cookie("abc");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn only_the_servers_own_origin_may_change_things() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080")])).is_ok());
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin"),
        ]))
        .is_ok());
        assert!(same_origin(&h(&[
            ("host", "console.example:443"),
            ("origin", "https://console.example:443"),
        ]))
        .is_ok());
        for bad in [
            h(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://evil.example"),
            ]),
            h(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8081"),
            ]),
            h(&[("host", "127.0.0.1:8080"), ("origin", "null")]),
            h(&[("origin", "http://127.0.0.1:8080")]),
            h(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "ftp://127.0.0.1:8080"),
            ]),
            h(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8080.evil"),
            ]),
            h(&[("host", "127.0.0.1"), ("origin", "http://127.0.0.1:8080")]),
            h(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")]),
            h(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "same-site")]),
        ] {
            assert!(same_origin(&bad).is_err(), "{bad:?}");
        }
    }
}
