//! The S3 backend of [`ChunkStore`]: a repository in a bucket of S3-compatible object storage
//! (Garage, MinIO, Ceph RGW, AWS), through the `object_store` crate (signing, retries,
//! timeouts, connection pooling).
//!
//! Layout under `s3://BUCKET/PREFIX/`, the same names as a local repository's:
//! ```text
//! livemount-repo.toml     format version, chunk size, repository id, creation time
//! chunks/ab/<64 hex>      one chunk (a zstd frame; the name is the BLAKE3 of its bytes)
//! snapshots/<64 hex>.json one manifest
//! ```
//! There is no `tmp/` and no `lock`: a PUT is atomic (an object is visible whole or not at all)
//! and durable once acknowledged, and every name is derived from its content, so two writers
//! putting the same name put the same bytes. A manifest is put only after every chunk it names
//! was acknowledged, so a snapshot is never visible before its chunks (decision 0010).
//!
//! Errors: a 404 is a missing chunk or manifest (or a missing bucket, named as such); 401/403
//! is refused credentials; a request that never got an answer (connect, timeout) after the
//! retries below is the repository being unreachable. Secrets are never part of an error or
//! a log line.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

use super::local::{RepoConfig, CONFIG_FILE};
use super::manifest::SnapshotId;
use super::store::{check_record_name, is_record_name, Area, Record};
use super::{ChunkId, ChunkSize, ChunkStore, RepoError, RepoLocation};

/// Keys deleted by one request of a batch delete (S3's DeleteObjects takes up to 1000).
const DELETE_BATCH: usize = 1000;

/// A connection that is not made in this long is a failed attempt (retried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One request, start to end of its body. A 4 MiB chunk at 10 MB/s takes under half of it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of a transient failure (connect error, timeout, 5xx), with exponential back-off
/// from 100 ms up to 2 s, for at most `RETRY_TIMEOUT` in all: a store that is down gives an
/// error within seconds (an uncached VM read then gets NFS3ERR_IO), never a hang.
const MAX_RETRIES: usize = 3;
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept to the store: enough for every fetch the scheduler runs at once.
const POOL_IDLE: usize = 64;

/// `[repository]` in a config file: how to reach an S3 repository. A field left out falls back
/// to the usual AWS environment variable (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`). Addressing is
/// path-style (`http://endpoint/bucket/key`) unless `virtual_hosted_style = true`.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:3900`; default: AWS's endpoint for the region.
    pub endpoint: Option<String>,
    /// Default `us-east-1` (Garage's default region is `garage`).
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow plain `http://` endpoints (default false).
    pub allow_http: Option<bool>,
    /// `http://bucket.endpoint/key` instead of path-style (default false).
    pub virtual_hosted_style: Option<bool>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "(hidden)"),
            )
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .finish()
    }
}

/// A repository in a bucket.
#[derive(Debug)]
pub struct S3Store {
    location: RepoLocation,
    bucket: String,
    /// `PREFIX/`, or empty for the bucket's top.
    prefix: String,
    client: AmazonS3,
}

impl S3Store {
    /// A client for `bucket`/`prefix` (no request is made yet).
    pub(crate) fn connect(
        bucket: &str,
        prefix: &str,
        config: &S3Config,
    ) -> Result<S3Store, RepoError> {
        let location = RepoLocation::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_pool_max_idle_per_host(POOL_IDLE),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            });
        // The AWS_* variables after our client options (AWS_ALLOW_HTTP is one of them), and the
        // config file's settings after those.
        for (key, value) in std::env::vars_os() {
            let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else {
                continue;
            };
            if key.starts_with("AWS_") {
                if let Ok(k) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    b = b.with_config(k, value);
                }
            }
        }
        if let Some(v) = &config.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &config.region {
            b = b.with_region(v);
        }
        if let Some(v) = &config.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &config.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = config.allow_http {
            b = b.with_allow_http(v);
        }
        if let Some(v) = config.virtual_hosted_style {
            b = b.with_virtual_hosted_style_request(v);
        }
        // The builder's errors name settings (a bad endpoint URL, a missing region), not secrets.
        let client = b.build().map_err(|e| RepoError::Store {
            repo: location.clone(),
            what: format!("cannot set up its client: {}", one_line(&e.to_string())),
        })?;
        Ok(S3Store {
            location,
            bucket: bucket.into(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            client,
        })
    }

    pub fn location(&self) -> &RepoLocation {
        &self.location
    }

    /// Creates a repository under the prefix, which must hold no object yet.
    pub(crate) async fn init(&self, chunk_size: ChunkSize) -> Result<RepoConfig, RepoError> {
        let top =
            (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.trim_end_matches('/')));
        let mut listing = self.client.list(top.as_ref());
        if listing
            .try_next()
            .await
            .map_err(|e| self.error(e))?
            .is_some()
        {
            return Err(RepoError::AlreadyExists {
                repo: self.location.clone(),
            });
        }
        let config = RepoConfig::new(chunk_size);
        let text = config.to_toml()?;
        self.client
            .put(&self.key(CONFIG_FILE), Bytes::from(text).into())
            .await
            .map_err(|e| self.error(e))?;
        Ok(config)
    }

    /// Reads and checks the repository's config.
    pub(crate) async fn open(&self) -> Result<RepoConfig, RepoError> {
        let text = match self.get(&self.key(CONFIG_FILE)).await {
            Ok(b) => b,
            Err(Missing) => {
                return Err(RepoError::NotARepository {
                    repo: self.location.clone(),
                    hint: String::new(),
                })
            }
            Err(Failed(e)) => return Err(e),
        };
        let text = std::str::from_utf8(&text).map_err(|_| RepoError::BadRepository {
            repo: self.location.clone(),
            what: format!("{CONFIG_FILE} is not UTF-8 text"),
        })?;
        RepoConfig::parse(text, &self.location)
    }

    fn key(&self, rest: &str) -> ObjectPath {
        // Every name is made here from a checked prefix and hex digests: always a valid path.
        ObjectPath::parse(format!("{}{rest}", self.prefix))
            .unwrap_or_else(|_| ObjectPath::from(format!("{}{rest}", self.prefix).as_str()))
    }

    fn chunk_key(&self, id: &ChunkId) -> ObjectPath {
        let hex = id.to_hex();
        self.key(&format!("chunks/{}/{hex}", &hex[..2]))
    }

    fn manifest_key(&self, id: &SnapshotId) -> ObjectPath {
        self.key(&format!("snapshots/{id}.json"))
    }

    fn record_key(&self, area: Area, name: &str) -> Result<ObjectPath, RepoError> {
        check_record_name(name)?;
        Ok(self.key(&format!("{}/{name}", area.dir())))
    }

    fn set_aside_key(&self, bin: &str, id: &ChunkId) -> Result<ObjectPath, RepoError> {
        check_record_name(bin)?;
        Ok(self.key(&format!("trash/{bin}/{}", id.to_hex())))
    }

    /// Every object under `dir` (a folder of the layout).
    async fn list_under(&self, dir: &str) -> Result<Vec<object_store::ObjectMeta>, RepoError> {
        self.client
            .list(Some(&self.key(dir)))
            .try_collect()
            .await
            .map_err(|e| self.error(e))
    }

    /// DELETE of one object; a 404 is no error.
    async fn delete_key(&self, key: &ObjectPath) -> Result<(), RepoError> {
        match self.client.delete(key).await {
            Ok(()) => Ok(()),
            Err(e) => match self.get_error(e) {
                Missing => Ok(()),
                Failed(e) => Err(e),
            },
        }
    }

    /// GET of a whole object; a 404 of the object (not of the bucket) is `Missing`.
    async fn get(&self, key: &ObjectPath) -> Result<Bytes, GetError> {
        let result = match self.client.get(key).await {
            Ok(r) => r,
            Err(e) => return Err(self.get_error(e)),
        };
        result.bytes().await.map_err(|e| self.get_error(e))
    }

    fn get_error(&self, e: object_store::Error) -> GetError {
        match e {
            object_store::Error::NotFound { .. } if !names_no_bucket(&e) => Missing,
            e => Failed(self.error(e)),
        }
    }

    /// What an object store failure means for the repository.
    fn error(&self, e: object_store::Error) -> RepoError {
        let repo = self.location.clone();
        let text = chain(&e).replacen("Generic S3 error: ", "", 1);
        match &e {
            // A listing of a missing bucket is not always a NotFound; its body says it.
            _ if names_no_bucket(&e) => RepoError::NoBucket {
                repo,
                bucket: self.bucket.clone(),
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => RepoError::Denied {
                repo,
                what: s3_code(&text).unwrap_or_else(|| one_line(&text)),
            },
            // Some stores answer refused keys with 400 and an S3 code.
            _ if is_denial(&text) => RepoError::Denied {
                repo,
                what: s3_code(&text).unwrap_or_else(|| one_line(&text)),
            },
            _ if is_transport(&e) => RepoError::Unreachable {
                repo,
                what: one_line(&text),
            },
            // A store that answers but cannot serve (a 5xx after the retries: Garage without
            // quorum while its nodes come back, a gateway in front of a store that is down) is
            // away too, and reads ride through it as through a refused connection.
            _ if is_server_error(&text) => RepoError::Unreachable {
                repo,
                what: s3_code(&text).unwrap_or_else(|| one_line(&text)),
            },
            _ => RepoError::Store {
                repo,
                what: s3_code(&text).unwrap_or_else(|| one_line(&text)),
            },
        }
    }
}

/// An object's Last-Modified as a timestamp.
fn timestamp(meta: &object_store::ObjectMeta) -> jiff::Timestamp {
    let t = meta.last_modified;
    jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

/// The chunks among listed objects (names of 64 hex digits), with their sizes.
fn chunks_of(objects: &[object_store::ObjectMeta]) -> Vec<(ChunkId, u64)> {
    objects
        .iter()
        .filter_map(|o| Some((ChunkId::from_hex(o.location.filename()?)?, o.size)))
        .collect()
}

enum GetError {
    Missing,
    Failed(RepoError),
}
use GetError::{Failed, Missing};

#[async_trait]
impl ChunkStore for S3Store {
    async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        match self.get(&self.chunk_key(id)).await {
            Ok(b) => Ok(b),
            Err(Missing) => Err(RepoError::MissingChunk { chunk: *id }),
            Err(Failed(e)) => Err(e),
        }
    }

    async fn has_chunk(&self, id: &ChunkId) -> Result<bool, RepoError> {
        match self.client.head(&self.chunk_key(id)).await {
            Ok(_) => Ok(true),
            Err(e) => match self.get_error(e) {
                Missing => Ok(false),
                Failed(e) => Err(e),
            },
        }
    }

    async fn put_chunk(&self, id: &ChunkId, stored: Bytes) -> Result<(), RepoError> {
        self.client
            .put(&self.chunk_key(id), stored.into())
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    async fn sync(&self) -> Result<(), RepoError> {
        // Every acknowledged PUT is durable already.
        Ok(())
    }

    async fn get_manifest(&self, id: &SnapshotId) -> Result<Bytes, RepoError> {
        match self.get(&self.manifest_key(id)).await {
            Ok(b) => Ok(b),
            Err(Missing) => Err(RepoError::NoSnapshot {
                spec: id.to_string(),
                hint: String::new(),
            }),
            Err(Failed(e)) => Err(e),
        }
    }

    async fn put_manifest(&self, id: &SnapshotId, bytes: Bytes) -> Result<(), RepoError> {
        self.client
            .put(&self.manifest_key(id), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    async fn list_manifests(&self) -> Result<Vec<SnapshotId>, RepoError> {
        let dir = self.key("snapshots");
        let objects: Vec<_> = self
            .client
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.error(e))?;
        let mut ids: Vec<SnapshotId> = objects
            .iter()
            .filter_map(|o| o.location.filename())
            .filter_map(|name| name.strip_suffix(".json").and_then(SnapshotId::from_hex))
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    async fn chunk_stored_size(&self, id: &ChunkId) -> Result<Option<u64>, RepoError> {
        match self.client.head(&self.chunk_key(id)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) => match self.get_error(e) {
                Missing => Ok(None),
                Failed(e) => Err(e),
            },
        }
    }

    async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), RepoError> {
        self.delete_key(&self.manifest_key(id)).await
    }

    async fn list_chunks(&self) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        Ok(chunks_of(&self.list_under("chunks").await?))
    }

    async fn put_record(&self, area: Area, name: &str, bytes: Bytes) -> Result<(), RepoError> {
        let key = self.record_key(area, name)?;
        self.client
            .put(&key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    async fn get_record(&self, area: Area, name: &str) -> Result<Option<Bytes>, RepoError> {
        match self.get(&self.record_key(area, name)?).await {
            Ok(b) => Ok(Some(b)),
            Err(Missing) => Ok(None),
            Err(Failed(e)) => Err(e),
        }
    }

    async fn list_records(&self, area: Area) -> Result<Vec<Record>, RepoError> {
        let mut out: Vec<Record> = self
            .list_under(area.dir())
            .await?
            .iter()
            .filter_map(|o| {
                let name = o.location.filename()?;
                is_record_name(name).then(|| Record {
                    name: name.to_string(),
                    modified: timestamp(o),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }

    async fn delete_record(&self, area: Area, name: &str) -> Result<(), RepoError> {
        self.delete_key(&self.record_key(area, name)?).await
    }

    async fn set_aside(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError> {
        // No rename on S3: a server-side copy, then the delete.
        let to = self.set_aside_key(bin, id)?;
        match self.client.copy(&self.chunk_key(id), &to).await {
            Ok(()) => {}
            Err(e) => match self.get_error(e) {
                Missing => return Ok(()),
                Failed(e) => return Err(e),
            },
        }
        self.delete_key(&self.chunk_key(id)).await
    }

    async fn list_bins(&self) -> Result<Vec<String>, RepoError> {
        let listing = self
            .client
            .list_with_delimiter(Some(&self.key("trash")))
            .await
            .map_err(|e| self.error(e))?;
        let mut out: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| {
                p.filename()
                    .filter(|n| is_record_name(n))
                    .map(str::to_string)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn list_set_aside(&self, bin: &str) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        check_record_name(bin)?;
        Ok(chunks_of(&self.list_under(&format!("trash/{bin}")).await?))
    }

    async fn get_set_aside(&self, bin: &str, id: &ChunkId) -> Result<Option<Bytes>, RepoError> {
        match self.get(&self.set_aside_key(bin, id)?).await {
            Ok(b) => Ok(Some(b)),
            Err(Missing) => Ok(None),
            Err(Failed(e)) => Err(e),
        }
    }

    async fn put_back(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError> {
        let from = self.set_aside_key(bin, id)?;
        if !self.has_chunk(id).await? {
            match self.client.copy(&from, &self.chunk_key(id)).await {
                Ok(()) => {}
                Err(e) => match self.get_error(e) {
                    Missing => return Ok(()),
                    Failed(e) => return Err(e),
                },
            }
        }
        self.delete_key(&from).await
    }

    async fn delete_set_aside(&self, bin: &str, ids: &[ChunkId]) -> Result<(), RepoError> {
        for batch in ids.chunks(DELETE_BATCH) {
            let keys: Vec<object_store::Result<ObjectPath>> = batch
                .iter()
                .map(|id| self.set_aside_key(bin, id))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .map(Ok)
                .collect();
            let mut results = self
                .client
                .delete_stream(futures::stream::iter(keys).boxed());
            while let Some(r) = results.next().await {
                if let Err(e) = r {
                    if let Failed(e) = self.get_error(e) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    async fn remove_bin(&self, _bin: &str) -> Result<(), RepoError> {
        // A prefix is no object: an empty bin is gone already.
        Ok(())
    }

    async fn now(&self) -> Result<jiff::Timestamp, RepoError> {
        // The store's own clock, as it stamps what is written now.
        let key = self.key("clock");
        self.client
            .put(
                &key,
                Bytes::from_static(b"the store's clock, read by livemount\n").into(),
            )
            .await
            .map_err(|e| self.error(e))?;
        let meta = self.client.head(&key).await.map_err(|e| self.error(e))?;
        Ok(timestamp(&meta))
    }
}

/// The error and all its sources, as one text.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = s.source();
    }
    text
}

/// Whether the request failed below HTTP (no connection, a timeout, a dropped connection).
fn is_transport(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = next {
        if s.downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return true;
        }
        next = s.source();
    }
    false
}

/// A response with a 5xx status, as object_store words it (its retry error type is not
/// public, so its text is all there is).
fn is_server_error(text: &str) -> bool {
    text.split("status code: ").skip(1).any(|rest| {
        rest.starts_with('5')
            && rest
                .as_bytes()
                .get(1..3)
                .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    })
}

/// A response whose S3 error code refuses the credentials.
fn is_denial(text: &str) -> bool {
    [
        "<Code>AccessDenied</Code>",
        "<Code>InvalidAccessKeyId</Code>",
        "<Code>SignatureDoesNotMatch</Code>",
        "<Code>InvalidToken</Code>",
        "<Code>ExpiredToken</Code>",
    ]
    .iter()
    .any(|c| text.contains(c))
}

/// A response whose body says the bucket itself is missing.
fn names_no_bucket(e: &object_store::Error) -> bool {
    chain(e).contains("NoSuchBucket")
}

/// The S3 error code and message of a response body (`<Code>..</Code>`, `<Message>..</Message>`).
fn s3_code(text: &str) -> Option<String> {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = text.find(&open)? + open.len();
        let len = text[start..].find(&close)?;
        Some(unescape(text[start..start + len].trim()))
    };
    let code = tag("Code")?;
    Some(match tag("Message") {
        Some(m) if !m.is_empty() => one_line(&format!("{code}: {m}")),
        _ => one_line(&code),
    })
}

/// The five XML entities, as S3 error bodies use them.
fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Folds a text onto one line of at most 400 characters (error bodies can be long XML).
fn one_line(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect();
    if text.chars().count() > 400 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_error_bodies_become_one_short_line() {
        let body = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>InvalidAccessKeyId</Code><Message>Forbidden: No such key: GK00</Message></Error>";
        assert_eq!(
            s3_code(body).unwrap(),
            "InvalidAccessKeyId: Forbidden: No such key: GK00"
        );
        assert_eq!(s3_code("no xml here"), None);
        assert_eq!(
            s3_code("<Code>ServiceUnavailable</Code><Message>[&quot;a&quot; &amp; b]</Message>")
                .unwrap(),
            "ServiceUnavailable: [\"a\" & b]"
        );
        let long = "x\n".repeat(500);
        let line = one_line(&long);
        assert!(!line.contains('\n'));
        assert_eq!(line.chars().count(), 401);
    }

    #[test]
    fn only_5xx_answers_are_the_store_being_away() {
        let e = "Error performing GET http://127.0.0.1:3900/b/chunks/ab in 10s, after 3 retries, max_retries: 3, retry_timeout: 10s  - Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>ServiceUnavailable</Code></Error>";
        assert!(is_server_error(e));
        assert!(is_server_error(
            "Server returned non-2xx status code: 500 Internal Server Error: "
        ));
        assert!(!is_server_error(
            "Server returned non-2xx status code: 404 Not Found: "
        ));
        assert!(!is_server_error(
            "Server returned non-2xx status code: 403 Forbidden: "
        ));
        assert!(!is_server_error("status code: 5"));
        assert!(!is_server_error("no status here"));
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = S3Config {
            secret_access_key: Some("very-secret".into()),
            access_key_id: Some("GK1".into()),
            ..S3Config::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("very-secret"), "{text}");
        assert!(text.contains("GK1"));
    }
}
