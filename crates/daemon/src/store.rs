//! The snapshot store on S3-compatible storage (path-style requests, so MinIO works).
//!
//! Keys, per user:
//!
//! ```text
//! users/<user_id>/snapshots/<generation>.json              manifest: the commit of a generation
//! users/<user_id>/snapshots/<generation>-<ulid>.tar.zst    the archive it names
//! ```
//!
//! Generations are zero-padded so they sort. An archive is uploaded under a key no other
//! writer uses; the generation is then claimed by creating its manifest with
//! `If-None-Match: *`, which the server refuses (412) when another machine claimed it
//! first. So two writers can never both own a generation, and an archive is never
//! overwritten. Integrity is the manifest's sha256 of the archive, checked by the reader;
//! ETags are not used (they are not MD5s for multipart uploads).
//!
//! Every call is bounded, so a store that accepts connections and never answers fails
//! boot and drain instead of hanging them: a call waits at most [`S3Config::timeout`] for its
//! answer, a download at most that long for each next piece of the body, and an upload at
//! most [`PART_TIMEOUT_FACTOR`] times that for each of its 8 MiB parts, taken together: the
//! parts go up at once and share the link, so a slow link that keeps moving finishes.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderValue};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::{Bucket, Region};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::S3Config;

const MANIFEST_FORMAT: u32 = 1;
const MANIFEST_SUFFIX: &str = ".json";
const ARCHIVE_CONTENT_TYPE: &str = "application/zstd";
/// An upload part's bound, in multiples of the call bound: 8 MiB in 4 x 30 s by default.
pub const PART_TIMEOUT_FACTOR: u32 = 4;
/// The client's own bound on any one request; the call bound and the idle bound of downloads
/// are what stop a call in practice.
const TRANSFER_CEILING: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("S3 request {operation} {key} failed")]
    Request {
        operation: &'static str,
        key: String,
        #[source]
        source: S3Error,
    },
    #[error(
        "S3 request {operation} {key} to {endpoint} got no answer within {}s",
        .after.as_secs()
    )]
    Timeout { operation: &'static str, key: String, endpoint: String, after: Duration },
    #[error("generation {generation} was already written by another machine")]
    GenerationTaken { generation: u64 },
    #[error("manifest {key} is not valid: {reason}")]
    BadManifest { key: String, reason: String },
    #[error("archive {key} is {actual} bytes, the manifest says {expected}")]
    SizeMismatch { key: String, expected: u64, actual: u64 },
    #[error("archive {key} has sha256 {actual}, the manifest says {expected}")]
    DigestMismatch { key: String, expected: String, actual: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the reader of the downloaded archive stopped early")]
    SinkClosed,
    #[error("configuring the S3 client")]
    Client(#[source] S3Error),
}

/// The record that commits a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub generation: u64,
    pub archive_key: String,
    pub sha256: String,
    pub size: u64,
    pub created_at: DateTime<Utc>,
}

/// One user's snapshots.
#[derive(Clone)]
pub struct SnapshotStore {
    /// Bounded here: each call in `bounded`, downloads by their idle time.
    bucket: Box<Bucket>,
    /// The endpoint without credentials, for errors.
    endpoint: String,
    timeout: Duration,
    prefix: String,
}

/// Written by hand: the bucket handle holds the credentials.
impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("bucket", &self.bucket.name())
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl SnapshotStore {
    pub fn new(config: &S3Config, user_id: Uuid) -> Result<Self, StoreError> {
        let region =
            Region::Custom { region: config.region.clone(), endpoint: config.endpoint.clone() };
        let credentials = Credentials::new(
            Some(&config.access_key_id),
            Some(config.secret_access_key.expose()),
            None,
            None,
            None,
        )
        .map_err(|e| StoreError::Client(e.into()))?;
        // rust-s3's client bound (60 s unless rebuilt with `with_request_timeout`; setting the
        // field alone changes nothing) covers a whole request, body included, and a failed
        // request is tried twice: too short for a large download, too long for a store that
        // never answers. So calls are bounded in `bounded`, downloads by their idle time and
        // uploads as a whole, under a client ceiling no real transfer reaches.
        let bucket = Bucket::new(&config.bucket, region, credentials)
            .map_err(StoreError::Client)?
            .with_path_style()
            .with_request_timeout(TRANSFER_CEILING)
            .map_err(StoreError::Client)?;
        Ok(Self {
            bucket,
            endpoint: endpoint_for_errors(&config.endpoint),
            timeout: config.timeout,
            prefix: format!("users/{user_id}/snapshots/"),
        })
    }

    pub fn manifest_key(&self, generation: u64) -> String {
        format!("{}{generation:016}{MANIFEST_SUFFIX}", self.prefix)
    }

    /// A key no other writer will use for generation `generation`.
    pub fn new_archive_key(&self, generation: u64) -> String {
        format!("{}{generation:016}-{}.tar.zst", self.prefix, ulid::Ulid::new())
    }

    /// Committed generations, oldest first.
    pub async fn generations(&self) -> Result<Vec<u64>, StoreError> {
        let pages =
            self.bounded("list", &self.prefix, self.bucket.list(self.prefix.clone(), None)).await?;
        let mut generations: Vec<u64> = pages
            .iter()
            .flat_map(|page| &page.contents)
            .filter_map(|object| object.key.strip_prefix(&self.prefix))
            .filter_map(|name| name.strip_suffix(MANIFEST_SUFFIX))
            .filter_map(|number| number.parse().ok())
            .collect();
        generations.sort_unstable();
        Ok(generations)
    }

    /// The newest committed manifest.
    pub async fn latest(&self) -> Result<Option<Manifest>, StoreError> {
        match self.generations().await?.last() {
            Some(&generation) => self.manifest(generation).await.map(Some),
            None => Ok(None),
        }
    }

    pub async fn manifest(&self, generation: u64) -> Result<Manifest, StoreError> {
        let key = self.manifest_key(generation);
        let response = self.bounded("get", &key, self.bucket.get_object(&key)).await?;
        let manifest: Manifest = serde_json::from_slice(response.as_slice())
            .map_err(|e| StoreError::BadManifest { key: key.clone(), reason: e.to_string() })?;
        if manifest.format != MANIFEST_FORMAT || manifest.generation != generation {
            let reason = format!("format {} generation {}", manifest.format, manifest.generation);
            return Err(StoreError::BadManifest { key, reason });
        }
        Ok(manifest)
    }

    /// Generation `generation`'s manifest, or `None` when no one has claimed it.
    pub async fn manifest_if_claimed(
        &self,
        generation: u64,
    ) -> Result<Option<Manifest>, StoreError> {
        match self.manifest(generation).await {
            Ok(manifest) => Ok(Some(manifest)),
            Err(StoreError::Request { source: S3Error::HttpFailWithBody(404, _), .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads the archive at `path` to `key` and checks the stored size.
    pub async fn upload_archive(&self, path: &Path, key: &str) -> Result<u64, StoreError> {
        let mut file = tokio::fs::File::open(path).await.map_err(io("opening", path))?;
        let expected = file.metadata().await.map_err(io("reading", path))?.len();
        // The whole upload may take as long as its parts would one after another at the part
        // bound: rust-s3 sends them at once, so they share the link, and a per-part bound
        // failed slow links that kept moving. A hung part is not tried again: the whole
        // upload ends at the bound.
        // FIXME: no bound on the upload's idle time; a store that stops answering mid-upload
        // is found only at the whole bound (parts x PART_TIMEOUT_FACTOR x the timeout).
        let parts = expected.div_ceil(s3::bucket::CHUNK_SIZE as u64).max(1);
        let part_bound = self.timeout * PART_TIMEOUT_FACTOR;
        let bound = part_bound.saturating_mul(u32::try_from(parts).unwrap_or(u32::MAX));
        let put =
            self.bucket.put_object_stream_with_content_type(&mut file, key, ARCHIVE_CONTENT_TYPE);
        match tokio::time::timeout(bound, put).await {
            Ok(result) => result.map_err(|source| request("put", key, source))?,
            Err(_) => return Err(self.timed_out("put", key, bound)),
        };

        // A multipart upload can report success with an error body; check what is stored.
        let (head, _) = self.bounded("head", key, self.bucket.head_object(key)).await?;
        let actual = head.content_length.unwrap_or_default().max(0) as u64;
        if actual != expected {
            return Err(StoreError::SizeMismatch { key: key.to_owned(), expected, actual });
        }
        Ok(actual)
    }

    /// Claims `manifest.generation`: creates its manifest only if no one else has.
    pub async fn commit(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let key = self.manifest_key(manifest.generation);
        let body = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
        let mut headers = HeaderMap::new();
        headers.insert("if-none-match", HeaderValue::from_static("*"));
        let put = self.bucket.put_object_with_content_type_and_headers(
            &key,
            &body,
            "application/json",
            Some(headers),
        );
        let Ok(result) = tokio::time::timeout(self.timeout, put).await else {
            return Err(self.timed_out("put", &key, self.timeout));
        };
        match result {
            Ok(_) => Ok(()),
            // 412: the manifest exists. 409: a concurrent conditional write won the race.
            Err(S3Error::HttpFailWithBody(412 | 409, _)) => {
                Err(StoreError::GenerationTaken { generation: manifest.generation })
            }
            Err(source) => Err(request("put", &key, source)),
        }
    }

    /// Streams the archive `manifest` names into `sink`, then checks its size and sha256:
    /// `Ok` means every byte `sink` got was the archive's. When `sink` closes early the
    /// rest is still read and checked, so a corrupt archive is reported as such
    /// (`SizeMismatch`, `DigestMismatch`) rather than as whatever choked on it (`Sink`).
    pub async fn download(
        &self,
        manifest: &Manifest,
        sink: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        let key = &manifest.archive_key;
        let mut stream = self.bounded("get", key, self.bucket.get_object_stream(key)).await?;
        let (mut hasher, mut size, mut sink_closed) = (Sha256::new(), 0u64, false);
        let bytes = stream.bytes();
        loop {
            let Ok(next) = tokio::time::timeout(self.timeout, bytes.next()).await else {
                return Err(self.timed_out("get", key, self.timeout));
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|source| request("get", key, source))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if !sink_closed {
                sink_closed = sink.send(chunk).await.is_err();
            }
        }

        if size != manifest.size {
            let (expected, actual) = (manifest.size, size);
            return Err(StoreError::SizeMismatch { key: key.clone(), expected, actual });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != manifest.sha256 {
            let expected = manifest.sha256.clone();
            return Err(StoreError::DigestMismatch { key: key.clone(), expected, actual });
        }
        if sink_closed {
            return Err(StoreError::SinkClosed);
        }
        Ok(())
    }

    /// Deletes every generation but the newest `keep`: the manifest first, so a reader
    /// never finds a manifest whose archive is gone.
    pub async fn prune(&self, keep: usize) -> Result<usize, StoreError> {
        let generations = self.generations().await?;
        let old = generations.len().saturating_sub(keep);
        for &generation in &generations[..old] {
            let manifest = self.manifest(generation).await?;
            let key = self.manifest_key(generation);
            self.delete(&key).await?;
            self.delete(&manifest.archive_key).await?;
        }
        Ok(old)
    }

    /// Deletes one object.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.bounded("delete", key, self.bucket.delete_object(key)).await?;
        Ok(())
    }

    /// Runs one call within the call bound.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        key: &str,
        call: impl Future<Output = Result<T, S3Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|source| request(operation, key, source)),
            Err(_) => Err(self.timed_out(operation, key, self.timeout)),
        }
    }

    fn timed_out(&self, operation: &'static str, key: &str, after: Duration) -> StoreError {
        StoreError::Timeout {
            operation,
            key: key.to_owned(),
            endpoint: self.endpoint.clone(),
            after,
        }
    }
}

/// `endpoint` with any user name and password removed.
fn endpoint_for_errors(endpoint: &str) -> String {
    match reqwest::Url::parse(endpoint) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => "the configured endpoint".to_owned(),
    }
}

impl Manifest {
    pub fn new(generation: u64, archive_key: String, sha256: String, size: u64) -> Self {
        Self {
            format: MANIFEST_FORMAT,
            generation,
            archive_key,
            sha256,
            size,
            created_at: Utc::now(),
        }
    }
}

fn request(operation: &'static str, key: &str, source: S3Error) -> StoreError {
    StoreError::Request { operation, key: key.to_owned(), source }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_owned(), source }
}
