//! The API server (axum).

use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::agent::{
    Agent, MountInfo, MountRequest, Plan, PlanError, PlanStatus, RelocateRequest, WarmError,
    WarmInfo, WarmRequest,
};
use crate::cache::CacheStats;
use crate::guestfs::{GuestFsError, Listing};
use crate::metrics::{BootSample, DiskSample, RelocationSample, Sample};
use crate::mount::MountError;
use crate::relocate::{RelocateError, RelocationStatus};

use super::session::{self, Sessions};

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub agent: Arc<Agent>,
    pub token: Arc<String>,
    /// Host name or address hypervisors use to reach the NFS server.
    pub advertise: String,
    pub export: String,
    pub nfs_port: u16,
    pub portmap: bool,
    /// The NBD server's port, if it is on.
    pub nbd_port: Option<u16>,
    /// The iSCSI target's port, if it is on.
    pub iscsi_port: Option<u16>,
    /// With it every iSCSI target requires CHAP, its secret derived from this key.
    pub chap_key: Option<[u8; 32]>,
    /// Serve `/metrics` to other hosts too (else to loopback only).
    pub metrics_public: bool,
    /// The changes under way (mounts, unmounts, relocations, warm-ups: [`run_to_end`]). A stop
    /// waits for every one of them, also past [`SHUTDOWN_GRACE`].
    pub changes: tokio_util::task::TaskTracker,
    /// The console's sign-in sessions.
    pub sessions: Arc<Sessions>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StatusReply {
    pub version: String,
    pub started: jiff::Timestamp,
    pub repository: String,
    pub export: String,
    pub advertise: String,
    pub nfs_port: u16,
    pub portmap: bool,
    /// The NBD server's port; none when NBD is off.
    #[serde(default)]
    pub nbd_port: Option<u16>,
    /// The iSCSI target's port; none when iSCSI is off.
    #[serde(default)]
    pub iscsi_port: Option<u16>,
    /// Whether every iSCSI target requires CHAP.
    #[serde(default)]
    pub iscsi_chap: bool,
    pub mounts: usize,
    pub cache: CacheStats,
    /// Chunk and manifest fetches from the repository's store since the server started.
    #[serde(default)]
    pub repository_fetches: crate::repo::RepoStats,
    /// Whether the store answers; an outage's start, error and held reads.
    #[serde(default)]
    pub store: crate::cache::outage::StoreState,
}

/// How a hypervisor attaches a mount.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttachInfo {
    /// ESXi: add the datastore (once per host), register the VM.
    pub esxi: Vec<String>,
    /// KVM: fetch and define the rewritten domain XML; the disks' URLs.
    pub kvm: Vec<String>,
    pub disk_urls: Vec<String>,
    /// Each disk as a block device, by each block protocol that is on: how QEMU, libvirt
    /// and Linux attach it (to a VM that is already running, say).
    #[serde(default)]
    pub block: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountReply {
    pub mount: MountInfo,
    pub attach: AttachInfo,
}

#[derive(serde::Serialize)]
struct ErrorReply {
    error: String,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorReply { error: self.1 })).into_response()
    }
}

impl From<MountError> for ApiError {
    fn from(e: MountError) -> Self {
        let code = match &e {
            MountError::BadName { .. }
            | MountError::BadHost { .. }
            | MountError::Conversion { .. } => StatusCode::BAD_REQUEST,
            MountError::Exists { .. } | MountError::Relocating { .. } => StatusCode::CONFLICT,
            MountError::NotFound { .. } => StatusCode::NOT_FOUND,
            MountError::Repo { source, .. } => match source {
                crate::repo::RepoError::NoSnapshot { .. }
                | crate::repo::RepoError::AmbiguousSnapshot { .. }
                | crate::repo::RepoError::Invalid(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            MountError::State { .. } | MountError::Config { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(code, e.to_string())
    }
}

impl From<WarmError> for ApiError {
    fn from(e: WarmError) -> Self {
        let code = match &e {
            WarmError::NoDiskCache | WarmError::NoProfile { .. } => StatusCode::CONFLICT,
            WarmError::NotFound { .. } => StatusCode::NOT_FOUND,
            WarmError::Repo(source) => match source {
                crate::repo::RepoError::NoSnapshot { .. }
                | crate::repo::RepoError::AmbiguousSnapshot { .. }
                | crate::repo::RepoError::Invalid(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        ApiError(code, e.to_string())
    }
}

impl From<PlanError> for ApiError {
    fn from(e: PlanError) -> Self {
        let code = match &e {
            PlanError::Invalid { .. } => StatusCode::BAD_REQUEST,
            PlanError::Busy { .. } => StatusCode::CONFLICT,
            PlanError::NotFound { .. } => StatusCode::NOT_FOUND,
            PlanError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

impl From<RelocateError> for ApiError {
    fn from(e: RelocateError) -> Self {
        let code = match &e {
            RelocateError::NoMount { .. } | RelocateError::NoRelocation { .. } => {
                StatusCode::NOT_FOUND
            }
            RelocateError::Busy { .. }
            | RelocateError::Refused(_)
            | RelocateError::Running { .. } => StatusCode::CONFLICT,
            RelocateError::Dest { .. } | RelocateError::DisksOnly { .. } => StatusCode::BAD_REQUEST,
            RelocateError::Roots(crate::relocate::DestError::Io { .. }) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            RelocateError::Roots(_) => StatusCode::BAD_REQUEST,
            RelocateError::State { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<GuestFsError> for ApiError {
    fn from(e: GuestFsError) -> Self {
        use crate::repo::RepoError;
        let code = match &e {
            GuestFsError::NoVolume { .. } | GuestFsError::NotFound { .. } => StatusCode::NOT_FOUND,
            GuestFsError::Repo(RepoError::NoSnapshot { .. }) => StatusCode::NOT_FOUND,
            GuestFsError::Repo(RepoError::AmbiguousSnapshot { .. } | RepoError::Invalid(_))
            | GuestFsError::Invalid(_) => StatusCode::BAD_REQUEST,
            // A kind this version cannot open (encrypted, swap, not supported yet): asking
            // again will not help, opening it elsewhere may.
            GuestFsError::NotOpenable { .. } => StatusCode::CONFLICT,
            // The file system is damaged or uses a feature this version does not read.
            GuestFsError::Open { .. } | GuestFsError::Fs { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            GuestFsError::Repo(_)
            | GuestFsError::Read { .. }
            | GuestFsError::Output { .. }
            | GuestFsError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

/// Serves the API on `listener` until `cancel` fires.
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    state: ApiState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let api = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/mounts", get(list).post(mount))
        .route("/v1/mounts/{name}", delete(unmount))
        .route(
            "/v1/mounts/{name}/relocation",
            axum::routing::post(relocate).delete(cancel_relocation),
        )
        .route(
            "/v1/mounts/{name}/relocation/finish",
            axum::routing::post(finish_relocation),
        )
        .route("/v1/relocations", get(relocations))
        .route("/v1/prestage", post(warm))
        .route("/v1/prestage/{id}", get(warm_status))
        .route("/v1/plans", post(apply_plan))
        .route("/v1/plans/status", post(plan_status))
        .route("/v1/plans/{id}", get(plan_run))
        .route("/v1/snapshots", get(snapshots))
        .route("/v1/snapshots/{id}/files", get(files_list))
        .route("/v1/snapshots/{id}/files/content", get(files_content))
        .route("/v1/profiles/{vm}", delete(forget_profile))
        .route("/v1/stats", get(stats))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    // /metrics is read-only counters for scrapers; it needs no token, and is served to
    // loopback only unless the config says `metrics_public = true` (it names mounts and
    // relocation destinations).
    // The console's page and its sign-in need no token (signing in is how a browser gets a
    // session); the routes check what they need themselves.
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/v1/session",
            get(session_info).post(sign_in).delete(sign_out),
        )
        .merge(super::console::routes())
        .merge(api)
        .layer(axum::Extension(Stopping(cancel.clone())))
        .with_state(state.clone());
    let changes = state.changes;
    let listener = super::listener::GuardedListener::new(
        listener,
        super::listener::MAX_CONNECTIONS,
        super::listener::IDLE,
    );
    let stop = cancel.clone();
    let serving = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<super::listener::Peer>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await });
    // A stop waits for the requests under way, but at most SHUTDOWN_GRACE: a download to a
    // slow client is not polled while its socket is full, so it may not see the stop itself.
    let served = tokio::select! {
        r = serving => r,
        _ = async {
            cancel.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("API requests still under way {SHUTDOWN_GRACE:?} after the stop; they are cut");
            Ok(())
        }
    };
    // A change whose request was cut still runs to its end (a mount or a relocation's
    // handover left half done at an await would be worse): the stop waits for it.
    changes.close();
    changes.wait().await;
    served
}

/// How long a stop waits for the API's requests under way (a download's client included).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Fires when the server stops: a download under way ends then (its connection is cut), or
/// the graceful shutdown, which waits for every connection, would wait for the slowest
/// client's whole file.
#[derive(Clone)]
struct Stopping(CancellationToken);

/// Runs a change to the agent as its own task, so that it runs to the end even if its client
/// goes away (or its connection is closed as idle) halfway: a mount or relocation cut short
/// at an await could leave half its work done.
async fn run_to_end<T: Send + 'static>(
    changes: &tokio_util::task::TaskTracker,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    changes.spawn(work).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request's task failed: {e}"),
        )
    })
}

/// Lets a request through with the bearer token, or with a live console session; a
/// session's request that changes anything must also carry its CSRF value and come from the
/// page's own origin ([`session_request`]).
async fn require_token(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = bearer {
        if constant_time_eq(t.as_bytes(), s.token.as_bytes()) {
            return next.run(req).await;
        }
        return ApiError(StatusCode::UNAUTHORIZED, WRONG_TOKEN.into()).into_response();
    }
    if session::cookie_session(req.headers()).is_none() {
        return ApiError(StatusCode::UNAUTHORIZED, WRONG_TOKEN.into()).into_response();
    }
    if let Err(e) = session_request(&s, req.method(), req.headers()) {
        return e.into_response();
    }
    next.run(req).await
}

const WRONG_TOKEN: &str =
    "missing or wrong bearer token (the token is in the state directory's api-token)";

/// Checks a request that carries a session cookie: the session is live, and a request that
/// may change anything (any method but GET and HEAD) carries the session's CSRF value in
/// [`session::CSRF_HEADER`] and comes from this server's own origin. Returns the session id.
fn session_request(
    s: &ApiState,
    method: &axum::http::Method,
    headers: &axum::http::HeaderMap,
) -> Result<String, ApiError> {
    let id = session::cookie_session(headers).ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "not signed in: sign in with the API token (in the state directory's api-token)".into(),
        )
    })?;
    let csrf = s.sessions.csrf(&id).ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "this console session has ended (signed out, expired, or the server restarted); sign in again"
                .into(),
        )
    })?;
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return Ok(id);
    }
    session::same_origin(headers).map_err(|e| ApiError(StatusCode::FORBIDDEN, e))?;
    let sent = headers
        .get(session::CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !constant_time_eq(sent.as_bytes(), csrf.as_bytes()) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "a change made with a console session needs its {} header; reload the page",
                session::CSRF_HEADER
            ),
        ));
    }
    Ok(id)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// What a signed-in page learns: the value to send in [`session::CSRF_HEADER`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SessionReply {
    pub csrf: String,
    pub expires_in_seconds: u64,
}

/// `POST /v1/session {"token": ...}`: the token for a session cookie.
async fn sign_in(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    session::same_origin(&headers).map_err(|e| ApiError(StatusCode::FORBIDDEN, e))?;
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if !constant_time_eq(req.token.trim().as_bytes(), s.token.as_bytes()) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong API token (it is in the server's state directory, in api-token)".into(),
        ));
    }
    let new = s.sessions.create().map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("making a session id: {e}"),
        )
    })?;
    let reply = SessionReply {
        csrf: new.csrf,
        expires_in_seconds: session::SESSION_TTL.as_secs(),
    };
    Ok((
        [
            (axum::http::header::SET_COOKIE, session::set_cookie(&new.id)),
            (axum::http::header::CACHE_CONTROL, "no-store".to_string()),
        ],
        Json(reply),
    )
        .into_response())
}

/// `GET /v1/session`: a signed-in page's CSRF value (after a reload); 401 when signed out.
async fn session_info(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_request(&s, &axum::http::Method::GET, &headers)?;
    let csrf = s.sessions.csrf(&id).unwrap_or_default();
    Ok((
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(SessionReply {
            csrf,
            expires_in_seconds: session::SESSION_TTL.as_secs(),
        }),
    )
        .into_response())
}

/// `DELETE /v1/session`: signs out (a change: it needs the CSRF header).
async fn sign_out(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_request(&s, &axum::http::Method::DELETE, &headers)?;
    s.sessions.remove(&id);
    Ok((
        [(axum::http::header::SET_COOKIE, session::clear_cookie())],
        Json(serde_json::json!({ "signed_out": true })),
    )
        .into_response())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(
    State(s): State<ApiState>,
    ConnectInfo(super::listener::Peer(peer)): ConnectInfo<super::listener::Peer>,
) -> Response {
    if !s.metrics_public && !peer.ip().to_canonical().is_loopback() {
        return ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "/metrics is served to loopback only, and {} is not; set metrics_public = true \
                 in serve's config file to serve it to other hosts",
                peer.ip()
            ),
        )
        .into_response();
    }
    let mounts = s.agent.mounts();
    let sched = s.agent.cache().scheduler_stats();
    let cache = s.agent.cache().stats();
    let sample = Sample {
        cache_bytes: cache.bytes,
        joined: cache.joined,
        repo: s.agent.repo().stats(),
        disk: s.agent.cache().disk().map(|d| {
            let st = d.stats();
            DiskSample {
                bytes: st.bytes,
                hits: st.hits,
                dropped: st.dropped,
            }
        }),
        mounts: mounts.len(),
        slots_busy: sched.in_flight,
        waiting: sched.waiting,
        started: sched.started,
        boots: mounts
            .iter()
            .map(|m| BootSample {
                mount: m.spec.name.clone(),
                boot_set: m.prestage.get().map(|p| {
                    let st = p.status();
                    (st.chunks, st.done())
                }),
                window: m.window.as_ref().map(|w| {
                    let st = w.status();
                    (st.hits, st.misses, st.storage_wait_seconds)
                }),
            })
            .collect(),
        relocations: s
            .agent
            .relocations()
            .into_iter()
            .filter(|r| {
                matches!(
                    r.phase,
                    crate::relocate::Phase::Copying
                        | crate::relocate::Phase::Synced
                        | crate::relocate::Phase::Finishing
                )
            })
            .map(|r| RelocationSample {
                mount: r.mount,
                copied: r.copied,
                total: r.total,
                bytes_per_second: r.bytes_per_second,
                eta_seconds: r.eta_seconds,
            })
            .collect(),
        store: s.agent.cache().store_state(),
    };
    let text = s.agent.metrics().render(&sample);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn status(State(s): State<ApiState>) -> Json<StatusReply> {
    Json(StatusReply {
        version: env!("CARGO_PKG_VERSION").into(),
        started: s.agent.started(),
        repository: s.agent.repo().location().to_string(),
        export: s.export.clone(),
        advertise: s.advertise.clone(),
        nfs_port: s.nfs_port,
        portmap: s.portmap,
        nbd_port: s.nbd_port,
        iscsi_port: s.iscsi_port,
        iscsi_chap: s.chap_key.is_some(),
        mounts: s.agent.mounts().len(),
        cache: s.agent.cache().stats(),
        repository_fetches: s.agent.repo().stats(),
        store: s.agent.cache().store_state(),
    })
}

async fn warm(
    State(s): State<ApiState>,
    Json(req): Json<WarmRequest>,
) -> Result<Json<WarmInfo>, ApiError> {
    let agent = s.agent.clone();
    Ok(Json(
        run_to_end(&s.changes, async move { agent.warm(&req).await }).await??,
    ))
}

async fn warm_status(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<WarmInfo>, ApiError> {
    Ok(Json(s.agent.warm_status(&id)?))
}

/// `POST /v1/plans`: checks the plan whole and starts applying it (or returns the run of
/// the same plan under way); 400 naming every bad entry, and nothing mounted, when it is bad.
async fn apply_plan(
    State(s): State<ApiState>,
    Json(plan): Json<Plan>,
) -> Result<Json<PlanStatus>, ApiError> {
    Ok(Json(s.agent.apply_plan(plan).await?))
}

/// `POST /v1/plans/status`: where each entry of the plan in the body stands; changes nothing.
async fn plan_status(State(s): State<ApiState>, Json(plan): Json<Plan>) -> Json<PlanStatus> {
    Json(s.agent.plan_status(&plan))
}

/// `GET /v1/plans/{id}`: this server's run of plan `id` (the id `POST /v1/plans` answered).
async fn plan_run(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<PlanStatus>, ApiError> {
    Ok(Json(s.agent.plan_run_status(&id)?))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesQuery {
    /// A volume or a path inside one; `/` (the default) lists the volumes.
    #[serde(default)]
    path: Option<String>,
    /// Only this disk (listing only): its device or its name in the config.
    #[serde(default)]
    disk: Option<String>,
}

/// `GET /v1/snapshots/{id}/files?path=P[&disk=D]`: what `livemount files ls --json` prints.
async fn files_list(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
) -> Result<Json<Listing>, ApiError> {
    let path = q.path.as_deref().unwrap_or("/");
    Ok(Json(
        s.agent
            .list_guest_files(&id, path, q.disk.as_deref())
            .await?,
    ))
}

/// `GET /v1/snapshots/{id}/files/content?path=P`: the regular file at P, streamed. A `Range:
/// bytes=A-B`, `bytes=A-` or `bytes=-N` header (one range) gives 206 and those bytes; any other
/// Range header is ignored and the whole file comes (RFC 9110 allows it).
async fn files_content(
    State(s): State<ApiState>,
    axum::Extension(Stopping(stopping)): axum::Extension<Stopping>,
    Path(id): Path<String>,
    Query(q): Query<FilesQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    use axum::http::header;
    let Some(path) = q.path.as_deref() else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "name the file to download: /v1/snapshots/{id}/files/content?path=/vda/part1/etc/hosts"
            ),
        ));
    };
    if q.disk.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "`disk` is for listings; a file's path names its disk already".into(),
        ));
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_range);
    let (start, len) = match range {
        None => (0, u64::MAX),
        Some(ByteRange::From(a, b)) => (a, b.map_or(u64::MAX, |b| b - a + 1)),
        Some(ByteRange::Last(n)) => {
            let size = s.agent.guest_file_size(&id, path).await?;
            (size.saturating_sub(n), n)
        }
    };
    let d = s.agent.download_guest_file(&id, path, start, len).await?;
    let size = d.entry.size;
    if range.is_some() && (start >= size || d.len == 0) {
        return Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            Json(ErrorReply {
                error: format!(
                    "{path} in snapshot {} is {size} bytes; the range asked for is not in it",
                    d.snapshot
                ),
            }),
        )
            .into_response());
    }
    let (status, content_range) = match range {
        Some(_) => (
            StatusCode::PARTIAL_CONTENT,
            Some(format!("bytes {start}-{}/{size}", start + d.len - 1)),
        ),
        None => (StatusCode::OK, None),
    };
    let disposition = content_disposition(&d.entry.name);
    let len = d.len;
    let what = format!("{path} in snapshot {}", d.snapshot);
    // The download (its lease, its place among the guest file operations) lives as long as
    // the body: to its end, or until the client goes away.
    let body = futures::stream::unfold((d, what, false), move |(mut d, what, ended)| {
        let stopping = stopping.clone();
        async move {
            if ended {
                return None;
            }
            let piece = tokio::select! {
                p = d.pieces.recv() => p,
                _ = stopping.cancelled() => Some(Err(GuestFsError::Task(
                    "the server is stopping".into(),
                ))),
            };
            match piece {
                Some(Ok(b)) => Some((Ok(b), (d, what, false))),
                Some(Err(e)) => {
                    tracing::warn!(file = %what, error = %e, "a download ended midway; its connection is cut");
                    Some((Err(e), (d, what, true)))
                }
                None => None,
            }
        }
    });
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(cr) = content_range {
        r = r.header(header::CONTENT_RANGE, cr);
    }
    r.body(axum::body::Body::from_stream(body)).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("building the reply: {e}"),
        )
    })
}

/// One byte range of a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// `bytes=A-B` (B inclusive) or `bytes=A-`.
    From(u64, Option<u64>),
    /// `bytes=-N`: the last N bytes.
    Last(u64),
}

/// A `Range` header of one byte range; anything else (several ranges, other units, B < A,
/// garbage) is `None`: the whole file is sent.
fn parse_range(v: &str) -> Option<ByteRange> {
    let spec = v.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let num = |t: &str| -> Option<u64> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => num(b).filter(|&n| n > 0).map(ByteRange::Last),
        (false, true) => num(a).map(|a| ByteRange::From(a, None)),
        (false, false) => {
            let (a, b) = (num(a)?, num(b)?);
            (b >= a).then_some(ByteRange::From(a, Some(b)))
        }
        (true, true) => None,
    }
}

/// `attachment` with the guest's file name made safe for every browser: a plain ASCII
/// `filename` (letters, digits, `._-+`, anything else `_`, no leading dot) and the name itself,
/// percent-encoded, as `filename*` (RFC 6266, 8187). Quotes, slashes, control characters and
/// CR/LF never reach the header.
fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let ascii = ascii.trim_start_matches('.');
    let ascii = if ascii.is_empty() { "download" } else { ascii };
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    if encoded.is_empty() || encoded.bytes().all(|c| c == b'.') {
        return format!("attachment; filename=\"{ascii}\"");
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// A mount as `GET /v1/mounts` lists it: what `mounts --json` shows, and how to attach it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListedMount {
    #[serde(flatten)]
    pub mount: MountInfo,
    pub attach: AttachInfo,
}

async fn list(State(s): State<ApiState>) -> Json<Vec<ListedMount>> {
    let mounts = s.agent.list().await;
    Json(
        mounts
            .into_iter()
            .map(|m| ListedMount {
                attach: attach_info(&s, &m),
                mount: m,
            })
            .collect(),
    )
}

/// `GET /v1/snapshots`: the snapshots by VM, newest first, with each VM's boot profile.
async fn snapshots(State(s): State<ApiState>) -> Result<Json<crate::agent::Catalog>, ApiError> {
    s.agent.catalog().await.map(Json).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing the repository's snapshots: {e}"),
        )
    })
}

/// `DELETE /v1/profiles/{vm}`: forgets a VM's boot profile, as `livemount profile forget`.
async fn forget_profile(
    State(s): State<ApiState>,
    Path(vm): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    use crate::profile::ProfileError;
    s.agent.forget_profile(&vm).await.map_err(|e| {
        let code = match &e {
            ProfileError::NotFound { .. } => StatusCode::NOT_FOUND,
            ProfileError::Io { .. } | ProfileError::Invalid { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(code, e.to_string())
    })?;
    Ok(Json(serde_json::json!({ "vm": vm, "forgotten": true })))
}

/// Fetches in flight, started so far, by class.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ByClass<T> {
    pub vm: T,
    pub prestage: T,
    pub background: T,
}

impl<T: Copy> From<[T; 3]> for ByClass<T> {
    fn from(a: [T; 3]) -> Self {
        ByClass {
            vm: a[0],
            prestage: a[1],
            background: a[2],
        }
    }
}

/// `GET /v1/stats`: the cache, the fetch scheduler, and the last minutes of the server's
/// counters (one point every `interval_seconds`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StatsReply {
    pub cache: CacheStats,
    /// Hits among the cache's lookups since the start; none before the first lookup.
    pub hit_ratio: Option<f64>,
    pub fetches_in_flight: ByClass<usize>,
    pub fetches_started: ByClass<u64>,
    pub fetches_waiting: usize,
    pub interval_seconds: u64,
    pub history: Vec<crate::metrics::history::Point>,
}

async fn stats(State(s): State<ApiState>) -> Json<StatsReply> {
    let cache = s.agent.cache().stats();
    let sched = s.agent.cache().scheduler_stats();
    let lookups = cache.hits + cache.misses;
    Json(StatsReply {
        hit_ratio: (lookups > 0).then(|| cache.hits as f64 / lookups as f64),
        cache,
        fetches_in_flight: sched.in_flight_by_class.into(),
        fetches_started: sched.started.into(),
        fetches_waiting: sched.waiting,
        interval_seconds: crate::metrics::history::INTERVAL.as_secs(),
        history: s.agent.history().points(),
    })
}

async fn mount(
    State(s): State<ApiState>,
    Json(req): Json<MountRequest>,
) -> Result<Json<MountReply>, ApiError> {
    let agent = s.agent.clone();
    let mount = run_to_end(&s.changes, async move { agent.mount(&req).await }).await??;
    let attach = attach_info(&s, &mount);
    Ok(Json(MountReply { mount, attach }))
}

#[derive(serde::Deserialize)]
struct UnmountQuery {
    #[serde(default)]
    keep_writes: bool,
}

async fn unmount(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<UnmountQuery>,
) -> Result<Json<crate::mount::MountSpec>, ApiError> {
    let agent = s.agent.clone();
    Ok(Json(
        run_to_end(&s.changes, async move {
            agent.unmount(&name, q.keep_writes).await
        })
        .await??,
    ))
}

async fn relocate(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<RelocateRequest>,
) -> Result<Json<RelocationStatus>, ApiError> {
    let agent = s.agent.clone();
    Ok(Json(
        run_to_end(&s.changes, async move { agent.relocate(&name, &req).await }).await??,
    ))
}

#[derive(serde::Deserialize)]
struct FinishQuery {
    #[serde(default)]
    force: bool,
}

async fn finish_relocation(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<FinishQuery>,
) -> Result<Json<RelocationStatus>, ApiError> {
    let agent = s.agent.clone();
    Ok(Json(
        run_to_end(&s.changes, async move {
            agent.finish_relocation(&name, q.force).await
        })
        .await??,
    ))
}

async fn cancel_relocation(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<RelocationStatus>, ApiError> {
    let agent = s.agent.clone();
    Ok(Json(
        run_to_end(
            &s.changes,
            async move { agent.cancel_relocation(&name).await },
        )
        .await??,
    ))
}

async fn relocations(State(s): State<ApiState>) -> Json<Vec<RelocationStatus>> {
    Json(s.agent.relocations())
}

/// How to reach a mount's iSCSI target: discovery and login for Linux and ESXi, each disk
/// (a LUN) for QEMU and libvirt. With CHAP on, the lines carry the target's user and secret.
fn iscsi_attach(s: &ApiState, m: &MountInfo, port: u16) -> Vec<String> {
    use crate::iscsi::{target_name, DatastoreTargets, CHAP_USER};
    let host = &s.advertise;
    let iqn = target_name(&m.spec.name);
    let secret = s
        .chap_key
        .as_ref()
        .map(|k| DatastoreTargets::chap_secret(k, &m.spec.name, m.spec.id));
    let portal = format!("{host}:{port}");
    let mut out = vec![format!("# {} over iSCSI: target {iqn}", m.spec.name)];
    let cred = secret
        .as_ref()
        .map(|x| format!("{CHAP_USER}%{x}@"))
        .unwrap_or_default();
    for (lun, f) in m.files.iter().filter(|f| f.disk).enumerate() {
        out.push(format!(
            "qemu-system-x86_64 ... -drive file=iscsi://{cred}{portal}/{iqn}/{lun},format=raw  # {}",
            f.name
        ));
        out.push(format!(
            "virsh attach-disk VM {iqn}/{lun} sdX --source-protocol iscsi --source-host-name {portal} --driver qemu --subdriver raw --live  # {}",
            f.name
        ));
    }
    out.push(format!("iscsiadm -m discovery -t sendtargets -p {portal}"));
    if let Some(x) = &secret {
        for (key, value) in [
            ("node.session.auth.authmethod", "CHAP"),
            ("node.session.auth.username", CHAP_USER),
            ("node.session.auth.password", x.as_str()),
        ] {
            out.push(format!(
                "iscsiadm -m node -T {iqn} -p {portal} -o update -n {key} -v {value}"
            ));
        }
    }
    out.push(format!("iscsiadm -m node -T {iqn} -p {portal} --login"));
    out.push(format!(
        "esxcli iscsi adapter discovery sendtarget add -A vmhba64 -a {portal}  # vmhba64: your software iSCSI adapter"
    ));
    if let Some(x) = &secret {
        out.push(format!(
            "esxcli iscsi adapter target portal auth chap set -A vmhba64 -a {portal} -n {iqn} -d uni -l required -N {CHAP_USER} -S {x}"
        ));
    }
    out.push("esxcli storage core adapter rescan -A vmhba64".to_string());
    out
}

fn attach_info(s: &ApiState, m: &MountInfo) -> AttachInfo {
    let base = format!("nfs://{}{}/{}", s.advertise, s.export, m.spec.name);
    let datastore = s.export.trim_matches('/').replace('/', "-");
    let disk_urls: Vec<String> = m
        .files
        .iter()
        .filter(|f| f.disk)
        .map(|f| format!("{base}/{}", f.name))
        .collect();
    let mut esxi = vec![format!(
        "esxcli storage nfs add -H {} -s {} -v {datastore}",
        s.advertise, s.export
    )];
    let mut kvm = Vec::new();
    // A disks-only mount has no VM to register: its disks are attached to one that runs.
    if !m.spec.disks_only {
        esxi.push(format!(
            "vim-cmd solo/registervm /vmfs/volumes/{datastore}/{}/{}",
            m.spec.name, m.config
        ));
        kvm.push(format!("nfs-cat {base}/{} > {}.xml", m.config, m.spec.name));
        kvm.push(format!(
            "virsh define {}.xml && virsh start {}",
            m.spec.name, m.spec.name
        ));
        kvm.push(format!(
            "# its disks have error_policy='stop' rerror_policy='stop': if the backup store stays \
             away longer than QEMU waits, the VM pauses instead of seeing an I/O error; once \
             `livemount status` says the store is reachable: virsh resume {}",
            m.spec.name
        ));
        esxi.push(
            "# an outage of the backup store: reads are held up to store_outage_grace, and ESXi \
             holds the VM's I/O through all-paths-down (Misc.APDTimeout, 140 s by default) \
             before it fails it"
                .to_string(),
        );
    }
    let mut block = Vec::new();
    if let Some(port) = s.nbd_port {
        let host = &s.advertise;
        for f in m.files.iter().filter(|f| f.disk) {
            let export = format!("{}/{}", m.spec.name, f.name);
            let url = format!("nbd://{host}:{port}/{export}");
            block.push(format!("# {export} over NBD"));
            block.push(format!(
                "qemu-system-x86_64 ... -drive file={url},format=raw"
            ));
            block.push(format!(
                "virsh attach-disk VM {export} vdX --source-protocol nbd --source-host-name {host}:{port} --driver qemu --subdriver raw --live"
            ));
            block.push(format!("nbd-client -N {export} {host} {port} /dev/nbd0"));
        }
    }
    if let Some(port) = s.iscsi_port {
        block.extend(iscsi_attach(s, m, port));
    }
    AttachInfo {
        esxi,
        kvm,
        disk_urls,
        block,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_one_span_are_read_and_the_rest_ignored() {
        assert_eq!(
            parse_range("bytes=0-99"),
            Some(ByteRange::From(0, Some(99)))
        );
        assert_eq!(parse_range("bytes=100-"), Some(ByteRange::From(100, None)));
        assert_eq!(parse_range("bytes=-5"), Some(ByteRange::Last(5)));
        assert_eq!(
            parse_range(" bytes= 7 - 8 "),
            Some(ByteRange::From(7, Some(8)))
        );
        for bad in [
            "bytes=5-4",
            "bytes=-0",
            "bytes=-",
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
            "",
        ] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn download_names_are_safe_in_the_header() {
        assert_eq!(
            content_disposition("hosts"),
            "attachment; filename=\"hosts\"; filename*=UTF-8''hosts"
        );
        assert_eq!(
            content_disposition("a \"b\"\r\n/x.txt"),
            "attachment; filename=\"a__b____x.txt\"; filename*=UTF-8''a%20%22b%22%0D%0A%2Fx.txt"
        );
        assert_eq!(
            content_disposition("héllo.txt"),
            "attachment; filename=\"h_llo.txt\"; filename*=UTF-8''h%C3%A9llo.txt"
        );
        assert_eq!(
            content_disposition(".bashrc"),
            "attachment; filename=\"bashrc\"; filename*=UTF-8''.bashrc"
        );
        assert_eq!(content_disposition(""), "attachment; filename=\"download\"");
        assert_eq!(
            content_disposition(".."),
            "attachment; filename=\"download\""
        );
        for name in ["\u{0}", "x;y=z", "日本語"] {
            let h = content_disposition(name);
            assert!(axum::http::HeaderValue::from_str(&h).is_ok(), "{h}");
            assert!(h.is_ascii() && h.matches('"').count() == 2, "{h}");
            assert!(!h.contains(['\r', '\n', '/', '\0']), "{h}");
        }
    }
}
