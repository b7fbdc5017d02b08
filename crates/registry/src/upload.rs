//! Pushing one blob: HEAD, then a cross-repository mount, then an upload in one request
//! or in chunks streamed from disk. A failed upload is cancelled and started again.

use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use futures_util::TryStreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Response, StatusCode, Url};
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use crate::layout::Descriptor;
use crate::stats::PushStats;
use crate::transport::{is_retryable, Call, Transport};
use crate::Error;

/// The read size when streaming a blob from disk.
const READ_BUFFER: usize = 256 * 1024;

/// How blobs are uploaded.
#[derive(Debug, Clone, Copy)]
pub struct UploadConfig {
    /// Blobs up to this size go in one `PUT`; larger ones in `PATCH` chunks.
    pub monolithic_limit: u64,
    /// The size of each `PATCH` (raised to the registry's `OCI-Chunk-Min-Length`).
    pub chunk_size: u64,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self { monolithic_limit: 8 * 1024 * 1024, chunk_size: 32 * 1024 * 1024 }
    }
}

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOutcome {
    /// The registry already had it.
    Present,
    /// Mounted from another repository of the same registry.
    Mounted,
    Uploaded,
}

/// An open upload session: where to send the next request.
struct Session {
    location: Url,
    min_chunk: u64,
}

/// Pushes `blob` (stored at `path`) to `repository`, trying a mount from `mount_from`.
pub(crate) async fn push_blob(
    transport: &Transport,
    config: &UploadConfig,
    repository: &str,
    blob: &Descriptor,
    path: &Path,
    mount_from: Option<&str>,
) -> Result<BlobOutcome, Error> {
    let scope = format!("repository:{repository}:pull,push");

    // 1. Skip what the registry has.
    if exists(transport, repository, &blob.digest, &scope).await? {
        transport.stats.blob_skipped();
        return Ok(BlobOutcome::Present);
    }
    check_size(blob, path)?;

    // 2. Upload, starting over from the first byte after a failure.
    let mut attempt = 0;
    loop {
        attempt += 1;
        // A mount is tried once; a retry goes straight to an upload.
        let mount = if attempt == 1 { mount_from } else { None };
        let result = upload_once(transport, config, repository, blob, path, &scope, mount).await;
        match result {
            Ok(outcome) => return Ok(outcome),
            Err((error, session)) if is_retryable(&error) && attempt < transport.retry.attempts => {
                tracing::warn!(
                    registry = %transport.registry,
                    digest = %blob.digest,
                    attempt,
                    error = %error,
                    "blob upload failed; starting it again",
                );
                if let Some(session) = session {
                    cancel(transport, &session, &blob.digest, &scope).await;
                }
                transport.stats.upload_restarted();
                tokio::time::sleep(transport.retry.backoff(attempt)).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}

async fn exists(
    transport: &Transport,
    repository: &str,
    digest: &str,
    scope: &str,
) -> Result<bool, Error> {
    let call = Call { op: "HEAD blob", what: digest, scope, retry: true };
    let url = transport.resolve(&call, &format!("/v2/{repository}/blobs/{digest}"))?;
    let response = transport.send(&call, |http| Ok(http.head(url.clone()))).await?;
    match response.status() {
        StatusCode::OK => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(transport.unexpected(&call, response).await),
    }
}

fn check_size(blob: &Descriptor, path: &Path) -> Result<(), Error> {
    let metadata = std::fs::metadata(path).map_err(|source| Error::Read {
        what: format!("blob {}", blob.digest),
        path: path.to_owned(),
        source,
    })?;
    if metadata.len() != blob.size {
        return Err(Error::Layout {
            path: path.to_owned(),
            reason: format!(
                "blob {} is {} bytes, its descriptor says {}",
                blob.digest,
                metadata.len(),
                blob.size
            ),
        });
    }
    Ok(())
}

/// One try at uploading; on failure also returns the session to cancel, if one was open.
async fn upload_once(
    transport: &Transport,
    config: &UploadConfig,
    repository: &str,
    blob: &Descriptor,
    path: &Path,
    scope: &str,
    mount_from: Option<&str>,
) -> Result<BlobOutcome, (Error, Option<Session>)> {
    let digest = blob.digest.as_str();

    // 1. Open a session, or finish at once when the mount worked.
    let session = match mount_from {
        Some(from) => match try_mount(transport, repository, digest, from).await {
            Ok(Mount::Done) => {
                transport.stats.blob_mounted();
                return Ok(BlobOutcome::Mounted);
            }
            // The registry began an upload instead: continue with it, never POST again.
            Ok(Mount::Session(session)) => session,
            Err(error) => {
                tracing::warn!(
                    registry = %transport.registry,
                    digest,
                    from,
                    error = %error,
                    "mount refused; uploading",
                );
                start(transport, repository, digest, scope).await.map_err(|e| (e, None))?
            }
        },
        None => start(transport, repository, digest, scope).await.map_err(|e| (e, None))?,
    };

    // 2. Send the bytes, in one request or in chunks, then commit with the digest.
    let result = if blob.size <= config.monolithic_limit {
        put_whole(transport, &session, blob, path, scope).await
    } else {
        put_chunks(transport, config, &session, blob, path, scope).await
    };
    match result {
        Ok(()) => {
            transport.stats.blob_uploaded();
            Ok(BlobOutcome::Uploaded)
        }
        Err(error) => Err((error, Some(session))),
    }
}

enum Mount {
    Done,
    Session(Session),
}

async fn try_mount(
    transport: &Transport,
    repository: &str,
    digest: &str,
    from: &str,
) -> Result<Mount, Error> {
    // Mounting needs pull on the source repository as well.
    let scope = format!("repository:{repository}:pull,push repository:{from}:pull");
    let call = Call { op: "mount blob", what: digest, scope: &scope, retry: true };
    let mut url = transport.resolve(&call, &format!("/v2/{repository}/blobs/uploads/"))?;
    url.query_pairs_mut().append_pair("mount", digest).append_pair("from", from);
    let response =
        transport.send(&call, |http| Ok(http.post(url.clone()).header(CONTENT_LENGTH, 0))).await?;
    match response.status() {
        StatusCode::CREATED => Ok(Mount::Done),
        StatusCode::ACCEPTED => Ok(Mount::Session(session_from(transport, &call, &response)?)),
        _ => Err(transport.unexpected(&call, response).await),
    }
}

async fn start(
    transport: &Transport,
    repository: &str,
    digest: &str,
    scope: &str,
) -> Result<Session, Error> {
    let call = Call { op: "start upload of", what: digest, scope, retry: true };
    let url = transport.resolve(&call, &format!("/v2/{repository}/blobs/uploads/"))?;
    let response =
        transport.send(&call, |http| Ok(http.post(url.clone()).header(CONTENT_LENGTH, 0))).await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(transport.unexpected(&call, response).await);
    }
    session_from(transport, &call, &response)
}

fn session_from(
    transport: &Transport,
    call: &Call<'_>,
    response: &Response,
) -> Result<Session, Error> {
    let location = next_location(transport, call, response)?;
    let min_chunk = response
        .headers()
        .get("OCI-Chunk-Min-Length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Session { location, min_chunk })
}

fn next_location(
    transport: &Transport,
    call: &Call<'_>,
    response: &Response,
) -> Result<Url, Error> {
    let Some(location) = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()) else {
        return Err(transport
            .protocol(call, format!("HTTP {} without a Location header", response.status())));
    };
    transport.resolve(call, location)
}

async fn put_whole(
    transport: &Transport,
    session: &Session,
    blob: &Descriptor,
    path: &Path,
    scope: &str,
) -> Result<(), Error> {
    let call = Call { op: "upload blob", what: &blob.digest, scope, retry: false };
    let mut url = session.location.clone();
    url.query_pairs_mut().append_pair("digest", &blob.digest);
    let stats = transport.stats.clone();
    let response = transport
        .send(&call, |http| {
            let body = file_body(path, 0, blob.size, &blob.digest, stats.clone())?;
            Ok(http
                .put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, blob.size)
                .body(body))
        })
        .await?;
    committed(transport, &call, response).await
}

async fn put_chunks(
    transport: &Transport,
    config: &UploadConfig,
    session: &Session,
    blob: &Descriptor,
    path: &Path,
    scope: &str,
) -> Result<(), Error> {
    let call = Call { op: "upload chunk of", what: &blob.digest, scope, retry: false };
    let chunk_size = config.chunk_size.max(session.min_chunk).max(1);
    let mut location = session.location.clone();
    let mut offset = 0;

    // 1. PATCH each chunk at its offset; every answer names the next Location.
    while offset < blob.size {
        let len = chunk_size.min(blob.size - offset);
        let end = offset + len - 1;
        let stats = transport.stats.clone();
        let target = location.clone();
        let response = transport
            .send(&call, |http| {
                let body = file_body(path, offset, len, &blob.digest, stats.clone())?;
                Ok(http
                    .patch(target.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, len)
                    .header("Content-Range", format!("{offset}-{end}"))
                    .body(body))
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(transport.unexpected(&call, response).await);
        }
        location = next_location(transport, &call, &response)?;
        offset += len;
    }

    // 2. Commit: an empty PUT with the digest.
    let commit = Call { op: "commit upload of", what: &blob.digest, scope, retry: false };
    let mut url = location;
    url.query_pairs_mut().append_pair("digest", &blob.digest);
    let response =
        transport.send(&commit, |http| Ok(http.put(url.clone()).header(CONTENT_LENGTH, 0))).await?;
    committed(transport, &commit, response).await
}

async fn committed(
    transport: &Transport,
    call: &Call<'_>,
    response: Response,
) -> Result<(), Error> {
    if response.status() != StatusCode::CREATED {
        return Err(transport.unexpected(call, response).await);
    }
    let echoed = response.headers().get("Docker-Content-Digest").and_then(|v| v.to_str().ok());
    if let Some(echoed) = echoed.filter(|d| *d != call.what) {
        return Err(transport.protocol(call, format!("the registry stored it as {echoed}")));
    }
    Ok(())
}

/// Best effort: an abandoned session would otherwise linger until the registry's purge.
async fn cancel(transport: &Transport, session: &Session, digest: &str, scope: &str) {
    let call = Call { op: "cancel upload of", what: digest, scope, retry: false };
    let url = session.location.clone();
    if let Err(error) = transport.send(&call, |http| Ok(http.delete(url.clone()))).await {
        tracing::debug!(
            registry = %transport.registry,
            digest,
            error = %error,
            "cancelling an upload failed",
        );
    }
}

/// `len` bytes of `path` from `offset`, read as they are sent; never held whole.
fn file_body(
    path: &Path,
    offset: u64,
    len: u64,
    digest: &str,
    stats: Arc<PushStats>,
) -> Result<reqwest::Body, Error> {
    let read_error =
        |source| Error::Read { what: format!("blob {digest}"), path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
    let reader = tokio::fs::File::from_std(file).take(len);
    let stream = ReaderStream::with_capacity(reader, READ_BUFFER)
        .inspect_ok(move |chunk| stats.add_bytes(chunk.len() as u64));
    Ok(reqwest::Body::wrap_stream(stream))
}
