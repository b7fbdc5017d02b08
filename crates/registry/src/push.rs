//! The push client: a layout's blobs, then its manifests, to one repository.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;

use crate::auth::{Authorizer, Credentials};
use crate::layout::{Layout, Manifest};
use crate::stats::{PushStats, StatsSnapshot};
pub use crate::transport::RetryPolicy;
use crate::transport::{Call, Transport};
use crate::upload::push_blob;
pub use crate::upload::{BlobOutcome, UploadConfig};
use crate::{Error, Reference};

/// How a [`Client`] talks to its registry.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub credentials: Credentials,
    pub upload: UploadConfig,
    pub retry: RetryPolicy,
    /// Blobs uploaded at the same time.
    pub concurrency: usize,
    /// The limit on establishing a connection (uploads themselves have no overall limit).
    pub connect_timeout: Duration,
    /// A repository of the same registry to mount blobs from before uploading them.
    pub mount_from: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            credentials: Credentials::Anonymous,
            upload: UploadConfig::default(),
            retry: RetryPolicy::default(),
            concurrency: 3,
            connect_timeout: Duration::from_secs(10),
            mount_from: None,
        }
    }
}

/// What a push produced.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The pushed image by digest: what a deploy pins.
    pub reference: Reference,
    pub digest: String,
    pub media_type: String,
    /// Every blob with what happened to it, in manifest order.
    pub blobs: Vec<(String, BlobOutcome)>,
}

/// A push client for one registry.
pub struct Client {
    transport: Transport,
    upload: UploadConfig,
    concurrency: usize,
    mount_from: Option<String>,
}

impl Client {
    /// A client of the registry `target` names (its repository and tag are not used here).
    pub fn new(target: &Reference, config: ClientConfig) -> Result<Self, Error> {
        let base = reqwest::Url::parse(&target.base_url()).map_err(|_| Error::Reference {
            input: target.to_string(),
            reason: "the registry is not a valid host",
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("matrix-registry/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::Transport {
                op: "set up client for",
                what: target.registry.clone(),
                registry: target.registry.clone(),
                attempts: 0,
                source,
            })?;
        let transport = Transport {
            http,
            base,
            registry: target.registry.clone(),
            auth: Authorizer::new(config.credentials, &target.registry),
            stats: Arc::new(PushStats::default()),
            retry: config.retry,
        };
        Ok(Self {
            transport,
            upload: config.upload,
            concurrency: config.concurrency.max(1),
            mount_from: config.mount_from,
        })
    }

    /// What this client has done so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.transport.stats.snapshot()
    }

    /// Pushes the image of the layout at `layout_dir` to `target`. `ref_name` picks a
    /// manifest of a layout that holds several (its `org.opencontainers.image.ref.name`).
    pub async fn push_layout(
        &self,
        layout_dir: &Path,
        ref_name: Option<&str>,
        target: &Reference,
    ) -> Result<Pushed, Error> {
        // 1. Read the layout first: a broken one fails before any network I/O.
        let layout = Layout::open(layout_dir)?;
        let manifest = layout.load(layout.select(ref_name)?)?;

        // 2. Learn how the registry wants to be spoken to.
        self.ping().await?;

        // 3. Blobs and child manifests, then the manifest under its tag.
        let mut blobs = Vec::new();
        self.push_manifest(&layout, &manifest, target, &target.reference, &mut blobs).await?;

        let digest = manifest.descriptor.digest.clone();
        tracing::info!(target = %target, %digest, "pushed image");
        Ok(Pushed {
            reference: target.with_reference(&digest),
            digest,
            media_type: manifest.media_type,
            blobs,
        })
    }

    async fn ping(&self) -> Result<(), Error> {
        let call = Call { op: "GET", what: "/v2/", scope: "", retry: true };
        let url = self.transport.resolve(&call, "/v2/")?;
        let response = self.transport.send(&call, |http| Ok(http.get(url.clone()))).await?;
        // A first 401 taught the scheme and was answered with credentials; a second one
        // means they are missing or wrong, which is better said before any upload.
        match response.status() {
            StatusCode::OK => Ok(()),
            _ => Err(self.transport.unexpected(&call, response).await),
        }
    }

    async fn push_manifest(
        &self,
        layout: &Layout,
        manifest: &Manifest,
        target: &Reference,
        reference: &str,
        outcomes: &mut Vec<(String, BlobOutcome)>,
    ) -> Result<(), Error> {
        // 1. Every distinct blob, a few at a time.
        let mut seen = BTreeSet::new();
        let blobs: Vec<_> =
            manifest.blobs.iter().filter(|b| seen.insert(b.digest.clone())).collect();
        let repository = target.repository.as_str();
        let mount_from = self.mount_from.as_deref().filter(|from| *from != repository);
        let pushed: Vec<(String, BlobOutcome)> = stream::iter(blobs)
            .map(|blob| async move {
                let path = layout.blob_path(&blob.digest)?;
                let outcome =
                    push_blob(&self.transport, &self.upload, repository, blob, &path, mount_from)
                        .await?;
                tracing::debug!(digest = %blob.digest, ?outcome, "blob pushed");
                Ok::<_, Error>((blob.digest.clone(), outcome))
            })
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        outcomes.extend(pushed);

        // 2. An index's manifests go first, by digest, so the index never dangles.
        for child in &manifest.children {
            Box::pin(self.push_manifest(layout, child, target, &child.descriptor.digest, outcomes))
                .await?;
        }

        // 3. The manifest itself: exact bytes, exact media type.
        self.put_manifest(manifest, repository, reference).await
    }

    async fn put_manifest(
        &self,
        manifest: &Manifest,
        repository: &str,
        reference: &str,
    ) -> Result<(), Error> {
        let scope = format!("repository:{repository}:pull,push");
        let digest = manifest.descriptor.digest.as_str();
        let call = Call { op: "put manifest", what: digest, scope: &scope, retry: true };
        let url =
            self.transport.resolve(&call, &format!("/v2/{repository}/manifests/{reference}"))?;
        let response = self
            .transport
            .send(&call, |http| {
                Ok(http
                    .put(url.clone())
                    .header(CONTENT_TYPE, manifest.media_type.as_str())
                    .header(CONTENT_LENGTH, manifest.bytes.len())
                    .body(manifest.bytes.clone()))
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.transport.unexpected(&call, response).await);
        }
        let echoed = response.headers().get("Docker-Content-Digest").and_then(|v| v.to_str().ok());
        if let Some(echoed) = echoed.filter(|d| *d != digest) {
            return Err(self.transport.protocol(&call, format!("the registry computed {echoed}")));
        }
        Ok(())
    }
}
